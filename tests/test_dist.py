"""nexus.dist: how a finished torchrun worker leaves (the one private CPython call NEXUS relies on)."""

import subprocess
import sys
import textwrap

from tiny import subprocess_env

# `atexit` has no public way to run its handlers early; exit_process uses atexit._run_exitfuncs.
# This pins what NEXUS relies on, in a real interpreter: handlers run once, in LIFO order, logging
# is flushed, buffered output is not lost, and the exit code is the one given.
SCRIPT = textwrap.dedent("""
    import atexit, logging, sys
    from nexus import dist
    logging.basicConfig(filename=sys.argv[1], level=logging.INFO, format="%(message)s")
    atexit.register(print, "first registered")
    atexit.register(print, "second registered")
    logging.getLogger("nexus").info("logged before exit")
    sys.stdout.write("buffered, no newline")
    dist.exit_process(3)
    print("never reached")
""")


def test_exit_process_runs_the_atexit_handlers_once_then_leaves_with_the_code(tmp_path):
    log = tmp_path / "log.txt"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], env=subprocess_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "buffered, no newlinesecond registered\nfirst registered\n"
    assert log.read_text() == "logged before exit\n"
