#!/bin/sh
echo "tinylm: coverage tools are offline stand-ins; no coverage report is produced" >&2
exit 0
