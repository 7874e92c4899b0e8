#!/bin/sh
# The service's own MariaDB account, with rights on its own database only (never root).
#
# The official MariaDB image runs this once, on an empty data directory, from
# /docker-entrypoint-initdb.d (deploy/docker-compose.yml mounts this folder there). The
# statements, and the rights they give, are in service-user.sql.template beside this script
# (the tests' servers use the same file); this script checks the values and fills them in. On a
# managed MySQL/MariaDB run that file's statements once as an administrator.
#
#   SERVICE_DB_PASSWORD   required; letters, digits and . _ ~ - only, so it can sit unescaped in
#                         COUPON_MYSQL_URL and in the SQL
#   SERVICE_DB_USER       default coupon
#   SERVICE_DB_NAME       default coupon (migrate creates it)
#   SERVICE_DB_HOST       where the account may connect from; default % (anywhere)
#   SERVICE_DB_SOCKET     the server's unix socket, when not the client's configured one
#                         (./scripts/run's private server); the client's option files win over
#                         its MYSQL_UNIX_PORT variable, an option does not
#   MARIADB_ROOT_PASSWORD the administrator's password (the image's own variable); the mariadb
#                         client's MYSQL_HOST / MYSQL_TCP_PORT / MYSQL_UNIX_PORT pick the server
set -eu

user="${SERVICE_DB_USER:-coupon}"
database="${SERVICE_DB_NAME:-coupon}"
password="${SERVICE_DB_PASSWORD:?SERVICE_DB_PASSWORD must be set}"
host="${SERVICE_DB_HOST:-%}"
template="$(dirname "$0")/service-user.sql.template"

valid() {  # valid NAME VALUE PATTERN-OF-FORBIDDEN-CHARACTERS
  case "$2" in
    '' | *$3*) echo "10-service-user.sh: $1 has a character outside the allowed set" >&2; exit 1 ;;
  esac
}
valid SERVICE_DB_USER "$user" '[!A-Za-z0-9_]'
valid SERVICE_DB_NAME "$database" '[!A-Za-z0-9_]'
valid SERVICE_DB_PASSWORD "$password" '[!A-Za-z0-9._~-]'
valid SERVICE_DB_HOST "$host" '[!A-Za-z0-9.%_-]'
[ -r "$template" ] || { echo "10-service-user.sh: $template is missing" >&2; exit 1; }
# In a database-level grant "_" is a wildcard; escape it so the grant names one database.
database_pattern="$(printf '%s' "$database" | sed 's/_/\\_/g')"

# In sed's replacement text \ and & are special, and | ends it here: escape them.
literal() { printf '%s' "$1" | sed 's/[\\&|]/\\&/g'; }
sed -e "s|{{user}}|$(literal "$user")|g" \
    -e "s|{{host}}|$(literal "$host")|g" \
    -e "s|{{password}}|$(literal "$password")|g" \
    -e "s|{{databases}}|$(literal "$database_pattern")|g" \
    "$template" \
  | MYSQL_PWD="${MARIADB_ROOT_PASSWORD:-}" mariadb --user=root \
      ${SERVICE_DB_SOCKET:+"--socket=$SERVICE_DB_SOCKET"}
echo "10-service-user.sh: account '$user' may use database '$database' only"
