-- Who changed what: one row per admin change (create, update, pause/resume, top-up, retire,
-- rebuild, reconcile repair, dead-letter replay and release), with the values before and after
-- as JSON. A change made in a MySQL transaction writes its row in that same transaction, so a
-- change is recorded exactly when it is made. Rows are never updated or deleted by the service.
CREATE TABLE IF NOT EXISTS admin_audit (
    id            BIGINT       NOT NULL AUTO_INCREMENT,
    date_created  DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    actor         VARCHAR(128) NOT NULL COMMENT 'the admin token name or the operator',
    origin        VARCHAR(32)  NOT NULL COMMENT 'admin-api, couponctl or worker',
    action        VARCHAR(32)  NOT NULL,
    coupon_id     BIGINT       NULL,
    before_values LONGTEXT     NULL CHECK (before_values IS NULL OR JSON_VALID(before_values)),
    after_values  LONGTEXT     NULL CHECK (after_values IS NULL OR JSON_VALID(after_values)),
    PRIMARY KEY (id),
    KEY ix_admin_audit_coupon (coupon_id, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- A retired coupon: its window has ended, every accepted request was settled, and its Redis
-- state is gone (but for its snapshot, kept as a marker). The counters its Redis state held
-- are kept here, so the admin view still answers them; its rows and dead letters stay in
-- their own tables.
CREATE TABLE IF NOT EXISTS coupon_retirements (
    coupon_id     BIGINT      NOT NULL,
    date_retired  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    requested     INT         NOT NULL COMMENT 'requests accepted over the coupon''s life',
    reserved      INT         NOT NULL COMMENT 'stock slots held at retirement',
    dead_lettered INT         NOT NULL,
    PRIMARY KEY (coupon_id),
    CONSTRAINT fk_coupon_retirements_coupon FOREIGN KEY (coupon_id) REFERENCES coupons (id)
        ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
