"""``faceindex serve``: a local web app and JSON API over the library, as thin as the command line.

``server`` binds, loads the models and runs uvicorn; ``app`` holds the pages, ``api`` the JSON routes,
``security`` what keeps other web sites out (host and origin checks, the form token, upload limits), ``discovery``
the ``serve.json`` file through which ``faceindex query`` finds a running server. Nothing here is imported by the
other commands except ``discovery``, which needs no web framework.
"""
