#!/bin/sh
# wpk-upgrade installer template (`wpk-upgrade wpk installer-template`): what an installer in a
# WPK must do, as the reference upgrade.sh does.
#
# The agent unpacks the WPK into $WPK_AGENT_HOME/var/upgrade, runs this script there (its
# environment also has WPK_AGENT_PID and WPK_AGENT_CONFIG) and waits for it to exit, at most
# upgrade.installer_timeout seconds (60). Exit 0 at once and do the work in the background:
#   1. install the new agent version (here: the VERSION file of the WPK becomes the agent's
#      version file; put your package manager's step in its place);
#   2. restart the agent: SIGHUP to the pid in var/run/agent.pid (it re-executes itself);
#   3. once the new agent is connected (var/run/agent.state says status=connected), write
#      var/upgrade/upgrade_result: 0 success, 2 failure (1: a dependency is missing).
# The restarted agent reads upgrade_result (after upgrade.result_wait seconds) and reports it
# to the manager: the task ends Updated (0) or Error (1, 2).
home="${WPK_AGENT_HOME:?WPK_AGENT_HOME not set}"
upgrade_dir="$home/var/upgrade"
new_version="$(cat "$upgrade_dir/VERSION")" || exit 1
mkdir -p "$home/logs" || exit 1
(
  sleep 0.3
  cp "$upgrade_dir/VERSION" "$home/etc/version.new" &&
    mv "$home/etc/version.new" "$home/etc/version"
  rm -f "$home/var/run/agent.state"
  kill -HUP "$(cat "$home/var/run/agent.pid")"
  i=0
  while [ "$i" -lt 300 ]; do
    if grep -q 'status=connected' "$home/var/run/agent.state" 2>/dev/null; then
      printf 0 > "$upgrade_dir/upgrade_result"
      echo "installed $new_version"
      exit 0
    fi
    sleep 0.1
    i=$((i + 1))
  done
  printf 2 > "$upgrade_dir/upgrade_result"
  echo "agent did not come back"
) > "$home/logs/installer.log" 2>&1 < /dev/null &
exit 0
