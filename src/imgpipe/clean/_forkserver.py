"""What clean's forkserver preloads (inputs whose storage is not fork-safe): the task's modules, imports done.

The forkserver preloads modules by name only, so importing this module does the work on
purpose: every decode worker the server forks then starts with clean's task function
imported, Pillow's plugins loaded and pyarrow's pandas lookup done
(:func:`imgpipe.clean.pool.import_before_fork`).
"""

import imgpipe.clean.decode  # noqa: F401 - the task function the workers run
from imgpipe.clean.pool import import_before_fork

import_before_fork()
