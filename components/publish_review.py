"""The review component of the audit: the audit's most suspect images out to a Label Studio project, for people to relabel."""

# No `from __future__ import annotations`: kfp reads the annotations as types.
from kfp import dsl
from kfp.dsl import Artifact, Input

from imgpipe.containers.catalog import image


# The gpu image: each suspect's picture is drawn as the folds' models saw it, with the train step's reader.
@dsl.component(base_image=image("gpu"), install_kfp_package=False)
def publish_review(audit: Input[Artifact], data_root: str, review_url: str, review_top: int) -> str:
    """Publishes the audit's ``review_top`` most suspect images to the Label Studio at ``review_url``; returns what it did.

    The API token is ``$LABEL_STUDIO_API_KEY``, from the Secret the review Component makes
    (:data:`imgpipe.review.client.SECRET`), and goes only to the Label Studio that Secret names
    (``review_url`` must be it: a run parameter is untrusted); no token is a parameter or in a log.
    Run again, it adds only new suspects and renews the pictures' links (:func:`imgpipe.review.loop.publish`).
    """
    import os

    from imgpipe.review.client import TOKEN_ENV, LabelStudio, operator_url
    from imgpipe.review.loop import publish
    from imgpipe.stepio import artifacts as ka

    dest = ka.read_step_artifact(audit, "audit", ka.read_policy(data_root))
    done = publish(dest, LabelStudio(operator_url(review_url), os.environ.get(TOKEN_ENV, "")), top=review_top)
    print(done.summary(), flush=True)
    return done.summary()
