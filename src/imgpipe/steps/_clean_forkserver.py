"""What clean's forkserver preloads (inputs whose storage is not fork-safe): the clean module, with its pre-fork imports done.

The forkserver preloads modules by name only, so importing this module does the work on
purpose: every decode worker the server forks then starts with Pillow's plugins loaded
and pyarrow's pandas lookup done (:func:`imgpipe.steps.clean.import_before_fork`).
"""

from imgpipe.steps.clean import import_before_fork

import_before_fork()
