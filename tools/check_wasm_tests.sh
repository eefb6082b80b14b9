#!/usr/bin/env bash
# Under wasm-bindgen-test-runner a plain std #[test] is silently NOT run (it is neither passed
# nor failed). Every Rust file of the filter and core crates with #[test] must therefore alias
# `use wasm_bindgen_test::wasm_bindgen_test as test;` under cfg(target_arch = "wasm32").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
status=0
while IFS= read -r file; do
  if ! grep -q 'wasm_bindgen_test as test' "$file"; then
    echo "$file: has #[test] but no \`use wasm_bindgen_test::wasm_bindgen_test as test;\` (its tests would not run under wasm)" >&2
    status=1
  fi
done < <(grep -rl --include='*.rs' '#\[test\]' src core tests 2>/dev/null || true)
exit "$status"
