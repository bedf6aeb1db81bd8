"""`nexus plot-metrics`: a PNG of a run's metrics, drawn without pyplot's global state."""

import subprocess
import sys
import textwrap

from tiny import subprocess_env

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    from nexus.train.plots import plot_metrics
    rows = [{"step": i, "loss": 3.0 / i, "ce": 2.0 / i, "kl": 1.0 / i, "lr": 1e-3, "temperature": 2.0,
             "grad_norm": 0.5, "router_l1": 0.1} for i in range(1, 11)]
    config = {"max_steps": 10, "learning_rate": 1e-3}
    path = plot_metrics(rows, Path(sys.argv[1]), config, title="run")
    print(path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n", "matplotlib.pyplot" in sys.modules)
""")


def test_metrics_plot_is_a_png_drawn_without_pyplot(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "plots" / "metrics.png")], env=subprocess_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "False"]  # a PNG; pyplot (and its global backend) never imported
