"""The operator's web console: dead letters browsed, fixed and replayed in a browser, behind a login."""
