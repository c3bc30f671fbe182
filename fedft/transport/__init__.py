"""The only code that touches Flower records, protobuf and gRPC.

Import the submodules directly (``fedft.transport.serde``, ``fedft.transport.flower_config``,
...): this package imports nothing itself, so loading one wire format never loads the others.
"""
