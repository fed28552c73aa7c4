-- A/B variants: each feedback event records the variant its user was bucketed in when it was
-- received, so online rates split by variant.
ALTER TABLE events ADD COLUMN variant text NOT NULL DEFAULT '';
