"""The verify-output component: what a cacheable task in a ``dsl.If`` branch handed on, checked (``--caching`` builds only)."""

from kfp import dsl

from imgpipe.containers.catalog import image


@dsl.component(base_image=image("cpu"), install_kfp_package=False)
def verify_output(prefix: str, step: str, data_root: str) -> str:
    """Returns ``prefix`` once it is checked to hold a committed output of ``step``.

    KFP 2.17's driver serves a cache hit without running the launcher, and only the launcher
    marks a ``dsl.If`` branch's DAG complete, so a branch whose one task was a hit stays
    RUNNING and the ``dsl.OneOf`` after it finds no branch that succeeded. This task, never
    cached, runs in the branch after that task: its launcher completes the branch, and it
    refuses an output the cache names but storage no longer holds.
    """
    from imgpipe.stepio import artifacts as ka

    return ka.verify_handed_on(prefix, step, data_root)
