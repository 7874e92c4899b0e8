#!/bin/sh
# The service's own MariaDB account, with rights on its own database only (never root).
#
# The official MariaDB image runs this once, on an empty data directory, from
# /docker-entrypoint-initdb.d (deploy/docker-compose.yml mounts this folder there). On a managed
# MySQL/MariaDB run the same statements once as an administrator. The rights are exactly what
# `couponctl db migrate` and the service need: read and write rows, create and alter their tables.
#
#   SERVICE_DB_PASSWORD   required; letters, digits and . _ ~ - only, so it can sit unescaped in
#                         COUPON_MYSQL_URL and in the SQL below
#   SERVICE_DB_USER       default coupon
#   SERVICE_DB_NAME       default coupon (migrate creates it)
#   MARIADB_ROOT_PASSWORD the administrator's password (the image's own variable); the mariadb
#                         client's MYSQL_HOST / MYSQL_TCP_PORT / MYSQL_UNIX_PORT pick the server
set -eu

user="${SERVICE_DB_USER:-coupon}"
database="${SERVICE_DB_NAME:-coupon}"
password="${SERVICE_DB_PASSWORD:?SERVICE_DB_PASSWORD must be set}"

valid() {  # valid NAME VALUE PATTERN-OF-FORBIDDEN-CHARACTERS
  case "$2" in
    '' | *$3*) echo "10-service-user.sh: $1 has a character outside the allowed set" >&2; exit 1 ;;
  esac
}
valid SERVICE_DB_USER "$user" '[!A-Za-z0-9_]'
valid SERVICE_DB_NAME "$database" '[!A-Za-z0-9_]'
valid SERVICE_DB_PASSWORD "$password" '[!A-Za-z0-9._~-]'
# In a database-level grant "_" is a wildcard; escape it so the grant names one database.
database_pattern="$(printf '%s' "$database" | sed 's/_/\\_/g')"

MYSQL_PWD="${MARIADB_ROOT_PASSWORD:-}" mariadb --user=root <<SQL
CREATE USER IF NOT EXISTS '$user'@'%' IDENTIFIED BY '$password';
ALTER USER '$user'@'%' IDENTIFIED BY '$password';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, REFERENCES ON \`$database_pattern\`.* TO '$user'@'%';
SQL
echo "10-service-user.sh: account '$user' may use database '$database' only"
