"""yamllint over the deployment YAML (config: istio/.yamllint.yaml)."""

from __future__ import annotations

import subprocess

from deploy_helpers import REPO, require_tool


def test_yamllint_is_clean():
    yamllint = require_tool("yamllint")
    result = subprocess.run(
        [yamllint, "--strict", "-c", "istio/.yamllint.yaml", "istio", "envoy/docker-compose.yaml"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
