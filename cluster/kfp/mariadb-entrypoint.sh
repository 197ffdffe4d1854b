#!/bin/sh
# KFP's database: Debian's MariaDB in the image cluster/images.sh builds. Upstream's mysql Deployment
# runs MySQL 8 as uid 999 on an empty volume with an empty root password; this does the same with
# MariaDB: the first start makes the data directory and lets root in from the pod network.
#
# usage: mariadb-entrypoint DATADIR
set -eu
datadir=${1:-/var/lib/mysql}
run=/tmp/mariadb
mkdir -p "$run"
if [ ! -d "$datadir/mysql" ]; then
	echo "initializing $datadir"
	mariadb-install-db --datadir="$datadir" --auth-root-authentication-method=normal --skip-test-db \
		--skip-name-resolve >"$run/install.log" 2>&1 || { cat "$run/install.log"; exit 1; }
fi
# Idempotent: run on every start, so a volume made by an earlier version gets it too.
cat >"$run/init.sql" <<'SQL'
CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY '';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
exec mariadbd --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 --skip-name-resolve --skip-log-bin \
	--socket="$run/mysqld.sock" --pid-file="$run/mysqld.pid" --init-file="$run/init.sql" \
	--character-set-server=utf8mb4 --collation-server=utf8mb4_general_ci
