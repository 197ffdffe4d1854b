"""``python -m imgpipe.remote STEP PAYLOAD_JSON``: a remote job's entry point (:mod:`imgpipe.remote.job`)."""

import sys

from imgpipe.remote.job import main

sys.exit(main())
