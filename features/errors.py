"""The one error tree of privrank. The server maps each class to a gRPC status in one place.

    PrivrankError
    ├── InvalidInput          bad request or input file           → INVALID_ARGUMENT
    │   └── PiiRejected       a value that looks like personal data → INVALID_ARGUMENT
    ├── NotFound              unknown item or user where one is required → NOT_FOUND
    ├── Unauthenticated       missing, expired or forged token    → UNAUTHENTICATED
    ├── PermissionDenied      role or subject not allowed         → PERMISSION_DENIED
    ├── Overloaded            admission control said no           → RESOURCE_EXHAUSTED
    ├── DeadlineExceeded      the request's budget ran out        → DEADLINE_EXCEEDED
    ├── NotReady              no snapshot / still warming         → UNAVAILABLE
    ├── StoreUnavailable      PostgreSQL or Redis down, timed out → UNAVAILABLE
    │   └── StoreUnreachable  its server not reached at all (refused, timed out, starting)
    ├── SnapshotError         a snapshot is missing, corrupt or incomplete
    ├── JobError              a batch job failed (one-line reason)
    │   └── JobLocked         another run holds the job lock
    └── ConfigError           a setting is missing or malformed (fail fast at start-up)

Driver errors (asyncpg, redis) are translated at the store boundary with ``raise ... from``.
"""


class PrivrankError(Exception):
    """Base of every error privrank raises on purpose."""


class InvalidInput(PrivrankError):
    """The caller's input is malformed; the message names the field."""


class PiiRejected(InvalidInput):
    """A value looks like personal data (email, phone, address) and was refused."""


class NotFound(PrivrankError):
    """A referenced entity does not exist."""


class Unauthenticated(PrivrankError):
    """No valid credentials."""


class PermissionDenied(PrivrankError):
    """Valid credentials, but not allowed to do this."""


class Overloaded(PrivrankError):
    """The server is at capacity; retry later."""


class DeadlineExceeded(PrivrankError):
    """The request's time budget ran out."""


class NotReady(PrivrankError):
    """The service cannot answer yet (nothing loaded, warming up)."""


class StoreUnavailable(PrivrankError):
    """A backing store could not be reached, timed out, or refused the work."""


class StoreUnreachable(StoreUnavailable):
    """The store's server could not be reached at all: down, not accepting connections yet,
    or the connection was lost. (One that answers and refuses is plain StoreUnavailable.)"""


class SnapshotError(PrivrankError):
    """A snapshot is missing, corrupt or incomplete."""


class JobError(PrivrankError):
    """A batch job failed; the message is the one-line reason."""


class JobLocked(JobError):
    """Another job run holds the lock."""


EXIT_LOCKED = 75  # a job's exit code on JobLocked (EX_TEMPFAIL): cron may retry later


class ConfigError(PrivrankError):
    """A setting is missing or malformed."""
