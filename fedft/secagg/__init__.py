"""Secure aggregation (Bonawitz et al., CCS 2017) for linear aggregators.

Pure message-passing objects (:class:`SecAggClient`, :class:`SecAggServer`) over plain
bytes and ints; the Flower shell carries the messages. :mod:`fedft.secagg.encoding` turns a
:class:`~fedft.types.ClientUpdate` into the weighted vector a client masks and turns the
server's unmasked sum back into an aggregation result.
"""

from fedft.secagg.protocol import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskRequest,
    RoutedShares,
    SecAggAbort,
    SecAggClient,
    SecAggClientState,
    SecAggError,
    SecAggParams,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    ShareCheck,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
)

__all__ = [
    "AdvertiseKeys",
    "KeyDirectory",
    "MaskRequest",
    "MaskedInput",
    "RoutedShares",
    "SecAggAbort",
    "SecAggClient",
    "SecAggClientState",
    "SecAggError",
    "SecAggParams",
    "SecAggProtocolError",
    "SecAggResult",
    "SecAggServer",
    "ShareCheck",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskShares",
]
