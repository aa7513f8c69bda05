"""Errors users can act on: one line, what is wrong and what to do (the CLI exits 2 on these)."""
import errno


class UserError(Exception):
    """Bad input, missing data or an unreachable model: the message is the whole story, no traceback."""


class Notice(UserWarning):
    """A one-line notice for users (deprecated id, fallback taken); the CLI prints these and hides the rest."""


# errno → what it means for a user, for writes that fail on a full or read-only disk (or a file-size limit).
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EFBIG: "file too large for the file system or the process's file-size limit",
               errno.EROFS: "read-only file system"}


# errno → what it means, for a path the user named that cannot be used (the command line says which one).
PATH_ERRORS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.ENOTDIR: "a file stands where a folder is needed"}


def os_error_message(err: OSError) -> str | None:
    """One line for an OSError the user can fix (full or read-only disk, a path they may not use); None for the
    rest, which stay unexpected failures."""
    where = err.filename or "a file"
    why = disk_problem(err)
    if why is not None:
        return f"cannot write {where} ({why}); free disk space or choose another output folder"
    if err.errno in PATH_ERRORS:
        return f"cannot use {where} ({PATH_ERRORS[err.errno]}); check the path or choose another one"
    return None


def disk_problem(err: BaseException) -> str | None:
    """What a failed write ran into when the disk is full or read-only (OSError, or safetensors' "os error N"
    text); None for other errors."""
    if isinstance(err, OSError) and err.errno in DISK_ERRORS:
        return DISK_ERRORS[err.errno]
    text = str(err)
    return next((why for code, why in DISK_ERRORS.items() if f"os error {code})" in text), None)
