"""Keep what C/C++ libraries print (libpng's 'iCCP: known incorrect sRGB profile' on stderr, libjpeg's
'Corrupt JPEG data' on stdout, MetaIO's parse errors, GDCM's notes) off the user's console: they write
to file descriptors 1 and 2 directly, past Python's sys.stdout and sys.stderr, so the descriptors
themselves are pointed at a temporary file while they run. The text is kept at debug level of the
`crossdiff.native` logger, for whoever needs it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

LOG = logging.getLogger("crossdiff.native")
DESCRIPTORS = (1, 2)


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Run the block with descriptors 1 and 2 redirected; restores them even if the block raises. Python
    warnings issued inside are held back and issued again afterwards, so they still reach the console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with _redirected():
                yield
        finally:
            held = list(caught)
    for warning in held:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@contextlib.contextmanager
def _redirected() -> Iterator[None]:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(descriptor) for descriptor in DESCRIPTORS]
    except (OSError, ValueError, AttributeError):  # no such descriptors (a daemon, a closed stream): nothing to do
        yield
        return
    with tempfile.TemporaryFile() as sink:
        for descriptor in DESCRIPTORS:
            os.dup2(sink.fileno(), descriptor)
        try:
            yield
        finally:
            for descriptor, copy in zip(DESCRIPTORS, saved):
                os.dup2(copy, descriptor)
                os.close(copy)
            sink.seek(0)
            text = sink.read(1 << 16).decode("utf-8", "replace").strip()
            if text:
                LOG.debug("native libraries wrote: %s", text)
