-- The seed's two tables with every column kept, plus what the seed lacked: UNIQUE(coupon_id,
-- user_id), column defaults in the DDL (so multi-row inserts stay pure %s placeholders), CHECKs
-- that make MySQL the last guard against overselling, and the stream entry id of each issue.
-- All DATETIME values are UTC (every connection sets time_zone = '+00:00').

CREATE TABLE IF NOT EXISTS coupons (
    id                   BIGINT       NOT NULL AUTO_INCREMENT,
    title                VARCHAR(255) NOT NULL,
    coupon_type          VARCHAR(255) NOT NULL DEFAULT 'FIRST_COME_FIRST_SERVED',
    total_quantity       INT          NULL COMMENT 'NULL = unlimited',
    issued_quantity      INT          NOT NULL DEFAULT 0,
    discount_amount      INT          NOT NULL DEFAULT 0,
    min_available_amount INT          NOT NULL DEFAULT 0,
    date_issue_start     DATETIME(6)  NOT NULL,
    date_issue_end       DATETIME(6)  NOT NULL,
    paused               TINYINT(1)   NOT NULL DEFAULT 0,
    date_created         DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    date_updated         DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
                                      ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    CONSTRAINT chk_coupons_window CHECK (date_issue_start < date_issue_end),
    CONSTRAINT chk_coupons_total CHECK (total_quantity IS NULL OR total_quantity >= 0),
    CONSTRAINT chk_coupons_cap CHECK (
        issued_quantity >= 0 AND (total_quantity IS NULL OR issued_quantity <= total_quantity)
    )
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS coupon_issues (
    id           BIGINT      NOT NULL AUTO_INCREMENT,
    coupon_id    BIGINT      NOT NULL,
    user_id      BIGINT      NOT NULL,
    request_id   VARCHAR(41) NULL COMMENT 'Redis stream entry id; NULL for the synchronous path',
    date_issued  DATETIME(6) NOT NULL COMMENT 'when Redis accepted the request',
    date_used    DATETIME(6) NULL,
    date_created DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    date_updated DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY uq_coupon_issues_coupon_user (coupon_id, user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One row per dead-lettered request. Written under the coupon row lock, like the issue rows, so
-- a late worker and the dead-letter path can never both win for the same request.
CREATE TABLE IF NOT EXISTS coupon_issue_dead_letters (
    coupon_id    BIGINT      NOT NULL,
    request_id   VARCHAR(41) NOT NULL,
    user_id      BIGINT      NULL,
    reason       VARCHAR(64) NOT NULL,
    date_created DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (coupon_id, request_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;
