"""The exception tree of tunl.

    TunlError                      anything tunl reports to its user
    ├── ConfigError                bad input: names the word and the rule it broke
    ├── NotFoundError              a device or tunnel that is not there
    ├── ExistsError                a name that is already taken
    ├── ForeignDeviceError         a device tunl did not create, which it will not touch
    ├── UnsupportedError           a valid request this data plane cannot carry out
    ├── LinkError                  the kernel refused a change (keeps the kernel's errno)
    └── DaemonError                tunld could not be reached or started
        └── NoDaemonError          no tunld runs here (and none was to be started)

The data plane never raises on a bad packet: it drops and counts (see dataplane.counters).
Exceptions are for bad configuration and for bugs.
"""


class TunlError(Exception):
    """Base of every error tunl shows to its user as one line."""


class ConfigError(TunlError):
    """Bad input. The message names the offending word and the rule."""


class NotFoundError(TunlError):
    pass


class ExistsError(TunlError):
    pass


class ForeignDeviceError(TunlError):
    pass


class UnsupportedError(TunlError):
    pass


class DaemonError(TunlError):
    pass


class NoDaemonError(DaemonError):
    pass


class LinkError(TunlError):
    """The kernel refused an operation; `code` is its errno."""

    def __init__(self, op: str, name: str, code: int, detail: str = ""):
        import os

        self.op, self.name, self.code = op, name, code
        why = detail or os.strerror(code)
        super().__init__(f"{op} {name}: {why}")


# name of each error class, so that tunld can send an error over its socket and the CLI
# can raise the same class again
BY_NAME = {c.__name__: c for c in (TunlError, ConfigError, NotFoundError, ExistsError,
                                    ForeignDeviceError, UnsupportedError, DaemonError,
                                    NoDaemonError)}
