"""privrank's tests.

The server package is imported first: it chooses gRPC's HTTP/2 server transport, which gRPC
reads only once, when it is imported (conftest imports grpc).
"""

import server  # noqa: F401
