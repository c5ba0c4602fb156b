#!/usr/bin/env bash
# Register the training rig's two runners, without questions: the *protected* runner (tag `gpu`: retrain,
# deploy, rollback, sweep) and the *candidate* runner (tag `gpu-candidate`: merge request candidates, in
# a container with read-only mounts; runner/config-candidate.toml.template). runner/README.md says why.
#
#   sudo GITLAB_URL=https://gitlab.example.com RUNNER_TOKEN=glrt-... CANDIDATE_TOKEN=glrt-... runner/register.sh
#
# 1. Create the runner in GitLab first (project > Settings > CI/CD > Runners > New project runner):
#    tags `gpu`, "Run untagged jobs" off, "Lock to current projects" on, maximum job timeout 12h,
#    "Protected" ON (only protected branches and tags). GitLab shows a `glrt-` token: that is RUNNER_TOKEN.
#    Then a second runner: tag `gpu-candidate`, not protected: its token is CANDIDATE_TOKEN (optional:
#    without it, merge requests get no candidate training).
#    (With `glrt-` tokens, `gitlab-runner register` refuses --tag-list, --locked, --run-untagged and
#    --access-level: those belong to the runner's settings in GitLab, not to the machine.)
# 2. This script checks the token, runs `gitlab-runner register --non-interactive`, then writes the
#    rig's config.toml from runner/config.toml.template (concurrency 1, the training card, the shared
#    DVC cache) and installs the systemd override.
#
# Optional: EXECUTOR (shell|docker, default shell), CUDA_VISIBLE_DEVICES (default 0),
# DVC_CACHE_DIR (/srv/dvc-cache), BUILDS_DIR (/srv/gitlab-runner/builds), HF_HOME (/srv/hf),
# DOCKER_IMAGE (nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04), CONFIG (/etc/gitlab-runner/config.toml),
# RUNNER_USER (gitlab-runner), DRY_RUN=1 (write the config to stdout, change nothing).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

: "${GITLAB_URL:?set GITLAB_URL, e.g. https://gitlab.example.com}"
: "${RUNNER_TOKEN:?set RUNNER_TOKEN to the glrt- token GitLab showed when you created the runner}"
EXECUTOR=${EXECUTOR:-shell}
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
DVC_CACHE_DIR=${DVC_CACHE_DIR:-/srv/dvc-cache}
BUILDS_DIR=${BUILDS_DIR:-/srv/gitlab-runner/builds}
HF_HOME=${HF_HOME:-/srv/hf}
DOCKER_IMAGE=${DOCKER_IMAGE:-nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04}
CONFIG=${CONFIG:-/etc/gitlab-runner/config.toml}
RUNNER_USER=${RUNNER_USER:-gitlab-runner}
CANDIDATE_TOKEN=${CANDIDATE_TOKEN:-}
CANDIDATE_CACHE_DIR=${CANDIDATE_CACHE_DIR:-/srv/gitlab-runner/candidate-cache}
# signs the train stage's checkpoint records (protected runner only): 32 random bytes, hex
CHECKPOINT_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')

fail() { echo "register.sh: $*" >&2; exit 1; }

case "$RUNNER_TOKEN" in
  glrt-*) ;;
  GR1348941*) fail "that is a registration token (deprecated flow); create the runner in GitLab and use its glrt- token" ;;
  *) fail "RUNNER_TOKEN does not start with glrt-: use the authentication token GitLab shows for a new runner" ;;
esac
case "$CANDIDATE_TOKEN" in
  ""|glrt-*) ;;
  *) fail "CANDIDATE_TOKEN does not start with glrt-: use the authentication token of the candidate runner" ;;
esac
[ -z "$CANDIDATE_TOKEN" ] || [ "$CANDIDATE_TOKEN" != "$RUNNER_TOKEN" ] || fail "CANDIDATE_TOKEN must be another runner than RUNNER_TOKEN"
case "$CANDIDATE_CACHE_DIR" in "$DVC_CACHE_DIR"|"$DVC_CACHE_DIR"/*|"$BUILDS_DIR"|"$BUILDS_DIR"/*) fail "CANDIDATE_CACHE_DIR must be apart from DVC_CACHE_DIR and BUILDS_DIR: the protected runner reads those" ;; esac
case "$EXECUTOR" in shell|docker) ;; *) fail "EXECUTOR must be shell or docker, not $EXECUTOR" ;; esac
case "$GITLAB_URL" in https://*|http://*) ;; *) fail "GITLAB_URL must start with https:// (or http://)" ;; esac
case "$DVC_CACHE_DIR" in "$BUILDS_DIR"/*) fail "DVC_CACHE_DIR must be outside BUILDS_DIR: git clean would delete it" ;; esac

render() {
  # sed with | separators; the values are paths, URLs and a token, none containing |
  sed -e "s|@GITLAB_URL@|$GITLAB_URL|g" -e "s|@RUNNER_TOKEN@|$RUNNER_TOKEN|g" -e "s|@EXECUTOR@|$EXECUTOR|g" \
    -e "s|@CUDA_VISIBLE_DEVICES@|$CUDA_VISIBLE_DEVICES|g" -e "s|@DVC_CACHE_DIR@|$DVC_CACHE_DIR|g" \
    -e "s|@BUILDS_DIR@|$BUILDS_DIR|g" -e "s|@HF_HOME@|$HF_HOME|g" -e "s|@DOCKER_IMAGE@|$DOCKER_IMAGE|g" \
    -e "s|@CANDIDATE_TOKEN@|$CANDIDATE_TOKEN|g" -e "s|@CANDIDATE_CACHE_DIR@|$CANDIDATE_CACHE_DIR|g" \
    -e "s|@CHECKPOINT_KEY@|$CHECKPOINT_KEY|g" \
    "$here/config.toml.template" $([ -n "$CANDIDATE_TOKEN" ] && echo "$here/config-candidate.toml.template")
}

if [ "${DRY_RUN:-0}" = 1 ]; then
  render | sed -e "s|$RUNNER_TOKEN|glrt-…(hidden)|g" -e "s|${CANDIDATE_TOKEN:-glrt-none}|glrt-…(hidden)|g" \
    -e "s|$CHECKPOINT_KEY|…(hidden)|g"
  exit 0
fi

[ "$(id -u)" = 0 ] || fail "run as root (it writes $CONFIG and a systemd override)"
command -v gitlab-runner >/dev/null || fail "gitlab-runner is not installed (packages.gitlab.com: apt install gitlab-runner)"

# Registration proves the token and the URL; its config is then replaced by the template's, which
# keeps the same token.
gitlab-runner register --non-interactive --url "$GITLAB_URL" --token "$RUNNER_TOKEN" \
  --executor "$EXECUTOR" --docker-image "$DOCKER_IMAGE" --name gpu-rig --config "$CONFIG.registered" >/dev/null
rm -f "$CONFIG.registered"
if [ -n "$CANDIDATE_TOKEN" ]; then
  gitlab-runner register --non-interactive --url "$GITLAB_URL" --token "$CANDIDATE_TOKEN" \
    --executor docker --docker-image "$DOCKER_IMAGE" --name gpu-rig-candidate --config "$CONFIG.registered" >/dev/null
  rm -f "$CONFIG.registered"
  install -d -m 0755 "$CANDIDATE_CACHE_DIR"
fi

install -d -m 0755 "$BUILDS_DIR" "$BUILDS_DIR/.llm-gitops-cache" "$HF_HOME"
install -d -m 2775 "$DVC_CACHE_DIR"   # setgid: files stay in the group (dvc config cache.shared group)
if id "$RUNNER_USER" >/dev/null 2>&1; then
  chown -R "$RUNNER_USER": "$BUILDS_DIR" "$HF_HOME"
  chown "$RUNNER_USER": "$DVC_CACHE_DIR"
  # the shell executor reaches the GPU through these groups
  for group in video render; do getent group "$group" >/dev/null && usermod -aG "$group" "$RUNNER_USER"; done
fi

umask 077
render > "$CONFIG.new"
mv "$CONFIG.new" "$CONFIG"
install -D -m 0644 "$here/systemd/override.conf" /etc/systemd/system/gitlab-runner.service.d/override.conf
systemctl daemon-reload
systemctl restart gitlab-runner
gitlab-runner verify --config "$CONFIG"
echo "registered; now run the doctor as $RUNNER_USER in a checkout: python -m pipeline.doctor"
