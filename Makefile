# The two set-up commands of the README. Each creates what it needs (scripts/venv.sh) on a fresh machine.
VERSIONS := 0.20.2 0.10.1.1
REFERENCE := 0.20.2

.PHONY: report test

report:  ## build the HTML reports for the default scenario into reports/
	scripts/venv.sh $(REFERENCE)
	.venvs/vllm-$(REFERENCE)/bin/diaglib report -o reports

test:  ## run the test suite under every supported vLLM version (all environments first: tests cross versions)
	@set -e; for v in $(VERSIONS); do scripts/venv.sh $$v; done; \
	for v in $(VERSIONS); do \
	  echo "== tests under vLLM $$v"; \
	  .venvs/vllm-$$v/bin/python -m pytest -q; \
	done
