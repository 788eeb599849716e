"""Sources (file, sftp, webhook, rest) and targets (http, sftp, file)."""
