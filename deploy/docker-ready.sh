#!/usr/bin/env bash
# Is Docker usable for `make test-deploy`? Exit 0: yes; exit 3: no, and it cannot be made so
# here (printed as a skip). Missing dockerd, compose or base images are set up with SETUP
# (argument 1: a script that installs Docker, e.g. one that adds Debian's docker.io and local base images)
# when it exists and we are root.
set -uo pipefail
SETUP=${1:-}
IMAGES="python:3.11-slim redis:7.2-alpine"
LOG=${TMPDIR:-/tmp}/helox-docker-setup.log

compose_ok() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }
missing() {
  command -v docker >/dev/null || { echo "no docker CLI"; return; }
  timeout 20 docker info >/dev/null 2>&1 || { echo "dockerd is not running"; return; }
  compose_ok || { echo "no docker compose"; return; }
  for image in $IMAGES; do
    docker image inspect "$image" >/dev/null 2>&1 || { echo "base image $image missing"; return; }
  done
}
skip() { echo "SKIPPED test-deploy: $*"; exit 3; }

why=$(missing)
[ -z "$why" ] && exit 0
[ -n "$SETUP" ] && [ -f "$SETUP" ] || skip "$why, and no setup script (DOCKER_SETUP=${SETUP:-unset})"
[ "$(id -u)" = 0 ] || skip "$why, and setting Docker up ($SETUP) needs root"
echo "test-deploy: $why: running $SETUP (log: $LOG)"
timeout 900 bash "$SETUP" >"$LOG" 2>&1 || { echo "$SETUP failed:"; tail -n 15 "$LOG"; }
why=$(missing)
[ -z "$why" ] && exit 0
case "$why" in
  "no docker CLI"|"dockerd is not running") skip "$why after $SETUP (dockerd cannot run here): see $LOG" ;;
  *) echo "FAILED test-deploy: dockerd runs, but $why after $SETUP: see $LOG"; exit 1 ;;
esac
