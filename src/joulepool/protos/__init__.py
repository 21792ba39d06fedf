"""Generated gRPC stubs of the kubelet APIs: device plugin v1beta1 and pod resources v1.

Regenerate with ``scripts/gen_proto.sh``; never edit the ``*_pb2*`` files by hand.
"""
