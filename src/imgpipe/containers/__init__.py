"""Real containers: the Docker-compatible engine, the step images, a Ray cluster of containers.

Everything here talks to the engine that ``DOCKER_HOST`` (or the default socket) names,
Docker or Podman, through the ``docker`` SDK (the ``containers`` extra), never through
a ``docker`` command line:

* :mod:`imgpipe.containers.engine`: connecting, with one clear error when nothing answers;
* :mod:`imgpipe.containers.build`: building the ``cpu``, ``ray`` and ``gpu`` images
  (``make images``), bootstrapping a base image from Debian packages where none can be
  pulled;
* :mod:`imgpipe.containers.raycluster`: a head and a worker container started the way
  KubeRay starts them, for ``imgpipe run --runner docker``.

This is the top layer: it may import the components (image names) and the library.
"""
