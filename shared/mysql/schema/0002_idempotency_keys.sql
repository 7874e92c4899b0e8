-- The keys of coupon creations (POST /admin/coupons with an Idempotency-Key header, couponctl
-- coupon create): a retried creation with the same key and the same body finds the coupon the
-- first one made instead of making a second. The key's row is written in the transaction that
-- inserts the coupon, so two requests racing with one key make one coupon (the second waits on
-- the key's lock, then finds it). A row goes with its coupon (a creation Redis refused is undone
-- whole), and rows older than a day are deleted by the next creation.

CREATE TABLE IF NOT EXISTS coupon_create_keys (
    idempotency_key VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,
    request_hash    CHAR(64)     NOT NULL COMMENT 'sha256 of the validated body',
    coupon_id       BIGINT       NOT NULL,
    date_created    DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (idempotency_key),
    KEY ix_coupon_create_keys_created (date_created),
    CONSTRAINT fk_coupon_create_keys_coupon FOREIGN KEY (coupon_id) REFERENCES coupons (id)
        ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
