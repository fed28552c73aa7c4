"""privrank's gRPC serving layer: the services, admission control, config and processes.

gRPC core reads ``GRPC_EXPERIMENTS`` once, when ``grpc`` is imported, and its HTTP/2 server
transport (``PRIVRANK_GRPC_TRANSPORT``) is one of them: it is chosen here, before any module of
this package imports grpc.
"""

import os

from server.config import choose_grpc_transport

choose_grpc_transport(os.environ)
