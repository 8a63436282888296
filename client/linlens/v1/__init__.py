"""Generated protobuf and gRPC code for the linlens.v1 contract (protos/linlens/v1/linlens.proto).

Do not edit the linlens_pb2* modules by hand: regenerate them with ``python scripts/gen_protos.py``; the test suite
fails when they are stale.
"""
