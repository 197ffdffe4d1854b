"""What a step's component reads and writes in Kubeflow Pipelines' terms, inside its pod or a local run.

``artifacts`` (input and output artifacts: paths, metadata, the step's report), ``lineage`` (which
inputs made an output), ``publish`` (the UI's markdown, metrics and HTML), ``shards`` (a source
planned into shards and merged back). Components and pipelines use them; ``imgpipe.kfp`` (what
talks to a KFP server and compiles for it) does not need them to reach a server.
"""
