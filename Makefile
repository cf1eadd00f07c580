# The two set-up commands of the README (report, test), and the release matrix. Each creates what it needs on a
# fresh machine: the tools (uv, nox) in .venvs/tools, then each vLLM release's environment (scripts/venv.sh, uv).
REFERENCE := 0.20.2
TOOLS := .venvs/tools/bin

.PHONY: report test matrix tools

tools: $(TOOLS)/nox
$(TOOLS)/nox: envs/tools.txt
	python3 -m venv .venvs/tools
	$(TOOLS)/python -m pip install -q --disable-pip-version-check -r envs/tools.txt
	touch $@

report: tools  ## build the HTML reports for the default scenario into reports/
	PATH="$(CURDIR)/$(TOOLS):$$PATH" scripts/venv.sh $(REFERENCE)
	.venvs/vllm-$(REFERENCE)/bin/diaglib report -o reports

test: tools  ## the full test suite under each CI release (noxfile.py: 0.10.1.1, 0.20.2, 0.33.0)
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(TOOLS)/nox -s tests

matrix: tools  ## every supported release in turn: build, version contract, remove; then docs/compat.md
	PATH="$(CURDIR)/$(TOOLS):$$PATH" $(TOOLS)/nox -s contract compat_md
