"""Kept for tests that `import harness`: the test kit lives in py/streamlb_testkit (installed
into .venv by `make venv`); new code imports streamlb_testkit directly."""

from streamlb_testkit import *  # noqa: F401,F403
from streamlb_testkit import Managed as _Managed  # noqa: F401 (old private names)
from streamlb_testkit import http_request as _http  # noqa: F401
