"""A local OpenAI-compatible server for tests, benchmarks and trying a set-up without a key:
``server`` (state, batches, the command line), ``handler`` (HTTP, faults, hostile answers) and
``answers`` (what a chat request gets back). Stdlib only."""
