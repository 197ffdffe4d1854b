"""The pipeline steps as plain functions: URIs and a typed config in, a StepReport out.

No module here imports kfp; the Kubeflow components in ``components/`` are thin
wrappers around these functions.
"""
