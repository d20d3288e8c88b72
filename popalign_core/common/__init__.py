"""Helpers every step of the flow shares: files on disk (`fileio`), what users type (`userinput`), the attribute axes
and their target distributions (`attributes`), documented config fields (`fields`), processes and mixed precision
(`distributed`), manifest files (`manifest`), lazy package exports (`lazy`).

Imports nothing else from the core: every other package may import `common`, `common` imports none of them.
"""
