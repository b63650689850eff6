# trojan-guard: `make demo` runs the offline job and the guard on the embedded MNIST digits,
# `make test` runs the test suite (what CI runs), `make test-fast` the tests that need no torch and no
# trained model. All create or reuse the virtualenv .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints.txt pins torch==2.13.0 (the CPU build on this machine's disk)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[offline,fleet,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trojan-forensics demo --out demo-out

# Debian packages the tests run: promtool and a real Prometheus server (deploy tests), and headless
# Chromium (the forensic report must render in a real browser)
DEBIAN_PKGS = command -v promtool >/dev/null && command -v prometheus >/dev/null && command -v chromium >/dev/null || \
	{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus chromium \
	  >/dev/null; }

test: $(STAMP)
	@$(DEBIAN_PKGS)
	$(VENV)/bin/pytest

# the guard, the deploy files and the layout, on the committed tiny bundle (tests/fixtures), with torch blocked
test-fast: $(STAMP)
	@$(DEBIAN_PKGS)
	TROJAN_GUARD_NO_TORCH=1 $(VENV)/bin/pytest -m "not slow and not torch" tests/guard tests/deploy tests/test_layout.py

bench: $(STAMP)
	# ART's STRIP is the baseline bench_guard compares against; only the bench needs it
	$(PY) -m pip install --quiet -c constraints.txt adversarial-robustness-toolbox
	$(PY) bench/bench_scan.py
	$(PY) bench/bench_patch.py
	$(PY) bench/bench_patch.py --models holdout
	$(PY) bench/bench_patch.py --models fresh
	$(PY) bench/bench_repair.py
	$(PY) bench/bench_audit.py
	$(PY) bench/bench_fleet.py
	$(PY) bench/bench_matrix.py --jobs 2
	$(PY) bench/bench_verdict.py
	$(PY) bench/bench_guard.py
	$(PY) bench/bench_overload.py
	$(PY) bench/bench_fuzz.py

clean:
	rm -rf $(VENV) demo-out bench-out
