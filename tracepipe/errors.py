"""One exception family for tracepipe. Bad *input* is data (rejects), not an exception: these are for
the environment (lake unwritable, binary missing) and for usage the CLI could not catch itself.
Each carries the exit code the CLI returns (table in README.md)."""

EXIT_OK = 0
EXIT_FOUND = 1  # done, and a sweep found new alerts
EXIT_USAGE = 2  # click's own usage errors, and arguments that do not parse
EXIT_PARTIAL = 3  # some input was rejected, the rest landed
EXIT_FAILED = 4  # nothing landed, or the environment is wrong
EXIT_ATTRIBUTION = 5  # the input landed, but the leases or the attribution to VMs failed
EXIT_PIPE = 141  # whoever read the output closed it early (`| head`): 128 + SIGPIPE, as any Unix tool


def combined_exit(ingest: int, correlation: int) -> int:
    """Exit code of an ingest followed by correlation: a failed attribution (5) outranks 0 and 3; nothing
    landed (4) stays 4."""
    if correlation != EXIT_OK and ingest != EXIT_FAILED:
        return correlation
    return ingest


class TracepipeError(Exception):
    """Base class; ``exit_code`` tells the CLI what to return."""

    exit_code = EXIT_FAILED


class UsageError(TracepipeError):
    """An argument the user typed does not parse (address, time, format)."""

    exit_code = EXIT_USAGE


class LakeError(TracepipeError):
    """The lake cannot be read or written (permissions, disk full, corrupt manifest)."""


class EnvironmentProblem(TracepipeError):
    """Something outside tracepipe is missing or wrong (a binary, a Java runtime)."""


class InputError(TracepipeError):
    """An input as a whole is unusable (file missing, unreadable). Per-record problems are rejects."""


class AttributionError(TracepipeError):
    """Leases or attribution failed after the input landed: run `tracepipe leases rebuild` to finish."""

    exit_code = EXIT_ATTRIBUTION
