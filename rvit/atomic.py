"""Files that appear whole or not at all: written under a temporary name, renamed when complete.

The one home of RViT's write-then-rename rule: a crash at any moment leaves either the previous
file or the complete new one; a `.tmp` file beside the final name is the only trace of a killed
run. Standard library only, so prepare_data.py can use it without importing torch.
"""
import contextlib
import os


class AtomicFiles:
    """Output files written under temporary names (`final + ".tmp"`) and renamed together; with
    `durable`, each file and its folder are fsynced at commit (survives a power loss). As a
    context manager: commit on success, discard (remove the temporaries, leave the final files
    as they were) on any exception, KeyboardInterrupt included."""

    def __init__(self, durable=False):
        self.durable, self.files = durable, []

    def path(self, final):
        """The temporary path to write instead of `final` (its folder is created)."""
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        self.files.append(final)
        return final + ".tmp"

    def commit(self):
        """Rename every temporary over its final name; returns the final paths."""
        for final in self.files:
            if self.durable:
                with open(final + ".tmp", "rb") as f:
                    os.fsync(f.fileno())
            os.replace(final + ".tmp", final)
        if self.durable:
            for folder in {os.path.dirname(os.path.abspath(f)) for f in self.files}:
                fd = os.open(folder, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return list(self.files)

    def discard(self):
        """Remove the temporaries that exist; final files are not touched."""
        for final in self.files:
            if os.path.exists(final + ".tmp"):
                os.remove(final + ".tmp")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


@contextlib.contextmanager
def atomic_write(final, durable=False):
    """Yield the temporary path to write instead of `final`; it is renamed over `final` when
    the block ends without an exception, and removed when one is raised."""
    with AtomicFiles(durable) as files:
        yield files.path(final)
