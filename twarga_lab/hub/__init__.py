"""Twarga Lab under JupyterHub: the sign-up authenticator and the service glue."""
