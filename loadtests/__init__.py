"""Load-test harness: dense vs pruned vs POP through the OpenAI API, one run, one report.

`loadtests.harness.run_loadtest(targets, settings, out_dir)` is the library entry point;
`python -m loadtests` / `intraslice loadtest` the command line; `loadtests.report.summary_table` the table.
Nothing is imported here: locust monkey-patches the standard library (gevent) when imported.
"""
