-- Item attributes: one short opaque category label per item ('' = none), loaded by
-- `privrank import items`; a re-import updates the label and updated_at (upsert on
-- (scope, item_id)). Labels are validated like IDs before they get here; the CHECK is the
-- last line of defence against free text. Items are not per-user, so no row-level security:
-- the service role gets the same table grant as in 0002 (a table grant covers new columns).
ALTER TABLE items ADD COLUMN category text NOT NULL DEFAULT ''
    CHECK (category = '' OR category ~ '^[A-Za-z0-9_.:/-]{1,64}$');
ALTER TABLE items ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
GRANT SELECT, INSERT, UPDATE, DELETE ON items TO privrank_service;
