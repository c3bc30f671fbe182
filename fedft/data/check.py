"""Refuse bad data input before any work starts.

Everything that can be known from the config and the data files is checked here, in the
command's own process, before Ray, a SuperLink or a model starts: the dataset name or file
(it exists, is UTF-8, parses, has the columns, no empty text or answer, labels that are
class names or ids, at least two classes), the task it can serve, the test and public sizes
against the rows there are, and a partition that gives every client data (enough groups
for ``natural``, enough examples for ``dirichlet`` and ``iid``).

The check *is* the run's own data pipeline (:func:`fedft.data.build_federated_data`, the
same function every client and the server call, memoised per process), so what passes
here cannot fail later for a data reason, and what it refuses is refused with the same
words. The one addition is the form: a :class:`DataError` whose message is one line naming
the key or file, the value and the fix.
"""

from __future__ import annotations

from typing import Any

from fedft.data import FederatedData, build_federated_data

__all__ = ["DataError", "check_data", "describe"]


class DataError(ValueError):
    """Bad data input. The message is one line: the key or file, the value, the fix."""


def check_data(**data_kwargs: Any) -> FederatedData:
    """Load, split and partition the data exactly as the run will, or raise DataError.

    Args:
        **data_kwargs: the arguments of :func:`fedft.data.build_federated_data`
            (``fedft.builders.data_kwargs(cfg)``).

    Returns:
        The run's data (memoised: the run in this process reuses it).

    Raises:
        DataError: the data cannot serve this run; the message says why and what to change.
    """
    dataset = str(data_kwargs.get("dataset", ""))
    try:
        return build_federated_data(**data_kwargs)
    except (ValueError, OSError) as exc:
        raise DataError(_one_line(exc, dataset)) from None


def describe(fed: FederatedData) -> str:
    """One line about a run's data: clients and their sizes, test and public examples."""
    sizes = [len(c) for c in fed.clients]
    labels = f", {fed.num_labels} classes" if fed.num_labels else ""
    return (
        f"{len(sizes)} clients with {min(sizes)}..{max(sizes)} examples (total {sum(sizes)}), "
        f"test {len(fed.test)}, public {len(fed.public)}{labels}"
    )


def _one_line(exc: BaseException, dataset: str) -> str:
    """The error as one line that names the dataset (unless it already does)."""
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        text = f"data.dataset = {dataset!r} cannot be read ({exc.strerror or exc}); check the path"
    else:
        text = str(exc)
    text = " ".join(text.split())  # one line, whatever the message held
    if dataset and dataset not in text and dataset.rsplit("/", 1)[-1] not in text:
        text = f"data.dataset = {dataset!r}: {text}"
    return text
