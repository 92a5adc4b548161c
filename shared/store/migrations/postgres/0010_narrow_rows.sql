-- Fewer bytes per imported row. Each row used to cost PostgreSQL about 2.4 KB of WAL and nine
-- index entries; this migration leaves one narrow index per bulk table (docs/performance.md
-- measures before and after, docs/concurrency.md has the argument).
--
-- identities: keyed by a 64-bit hash of (directory, kind, value) instead of the three as text,
-- with nothing but the primary key. The value is kept beside the key, so a collision can never
-- hand one person's identity to another: a key already taken by another value moves the
-- identity to the next free key (open addressing; identities are never deleted, so a probe
-- stops at the first free key). The hash is the first 8 bytes of
-- SHA-256(directory id bytes || kind byte || value as UTF-8), read as a signed big-endian
-- integer; the store computes the same in Rust (`store::postgres::identity_key`).
--
-- profiles: the state is typed columns, one value and one version per known field (a version
-- column for the fields that share the profile's most common one), so a merge is an in-place
-- update of the columns that changed; free-form attributes stay JSON. A
-- profile's identities live in its row (what the API lists with it), which the old secondary
-- index by profile served. The one index is the primary key (directory, id), and profiles are
-- paged by that id, which is time-ordered (UUIDv7): the sequence and its two indexes go.
-- Scoping to the organization goes through the directory.
--
-- records: only what the store reads back (the identity columns find duplicates within a
-- source when it completes) plus the profile a row resolved to. The values of a row are in the
-- uploaded file, which the object store keeps, and in the profile's versions, which name the
-- (source, row) that wrote each field; the JSON copy of every row was written and never read.
--
-- A version (source sequence, row number) packs into one BIGINT: sequence * 2^32 + row. The
-- store refuses a commit past either bound (2^31 sources, 2^32 rows in one file) with an
-- error, rather than wrap.

CREATE FUNCTION orbit_identity_key(directory UUID, kind SMALLINT, value TEXT) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT ('x' || encode(substring(sha256(
        decode(replace(directory::text, '-', ''), 'hex')
        || decode(lpad(to_hex(kind::INT), 2, '0'), 'hex')
        || convert_to(value, 'UTF8')) FROM 1 FOR 8), 'hex'))::bit(64)::bigint $$;

CREATE TABLE identities (
    key BIGINT PRIMARY KEY,
    directory_id UUID NOT NULL,
    kind SMALLINT NOT NULL,
    value TEXT NOT NULL,
    profile_id UUID NOT NULL
);

-- Kinds by number, in resolution order: 0 email, 1 linkedin_url, 2 phone.
INSERT INTO identities (key, directory_id, kind, value, profile_id)
SELECT orbit_identity_key(i.directory_id, k.kind, i.value), i.directory_id, k.kind, i.value, i.profile_id
FROM profile_identities i
JOIN (VALUES ('email', 0::SMALLINT), ('linkedin_url', 1::SMALLINT), ('phone', 2::SMALLINT)) AS k(name, kind)
  ON k.name = i.kind
ORDER BY 1
ON CONFLICT DO NOTHING;

-- The ones whose key was taken (by a colliding value): probe onwards, as the store does.
DO $$
DECLARE
    r RECORD;
    k BIGINT;
    done BOOLEAN;
BEGIN
    FOR r IN
        SELECT i.directory_id, x.kind, i.value, i.profile_id
        FROM profile_identities i
        JOIN (VALUES ('email', 0::SMALLINT), ('linkedin_url', 1::SMALLINT), ('phone', 2::SMALLINT)) AS x(name, kind)
          ON x.name = i.kind
        WHERE NOT EXISTS (
            SELECT 1 FROM identities n
            WHERE n.directory_id = i.directory_id AND n.kind = x.kind AND n.value = i.value)
    LOOP
        k := orbit_identity_key(r.directory_id, r.kind, r.value);
        LOOP
            k := CASE WHEN k = 9223372036854775807 THEN -9223372036854775808 ELSE k + 1 END;
            INSERT INTO identities (key, directory_id, kind, value, profile_id)
            VALUES (k, r.directory_id, r.kind, r.value, r.profile_id)
            ON CONFLICT DO NOTHING;
            GET DIAGNOSTICS done = ROW_COUNT;
            EXIT WHEN done;
        END LOOP;
    END LOOP;
END $$;

CREATE FUNCTION orbit_version(v JSONB) RETURNS BIGINT
    LANGUAGE SQL IMMUTABLE PARALLEL SAFE
    AS $$ SELECT (v->>0)::BIGINT * 4294967296 + (v->>1)::BIGINT $$;

CREATE TABLE typed_profiles (
    directory_id UUID NOT NULL,
    id UUID NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    -- The version of every field whose own <field>_v is NULL: most fields of a profile were
    -- written by the same row, and one column says so for all of them (about 60 bytes a row).
    version BIGINT,
    first_name TEXT, first_name_v BIGINT,
    last_name TEXT, last_name_v BIGINT,
    full_name TEXT, full_name_v BIGINT,
    email TEXT, email_v BIGINT,
    phone TEXT, phone_v BIGINT,
    company TEXT, company_v BIGINT,
    title TEXT, title_v BIGINT,
    linkedin_url TEXT, linkedin_url_v BIGINT,
    city TEXT, city_v BIGINT,
    country TEXT, country_v BIGINT,
    -- {"name": {"value": …, "version": [sequence, row]}}, NULL when there are none.
    attributes TEXT,
    -- One identity per line, "<kind number>:<value>" (backslash and newline escaped as \\
    -- and \n): about 50 bytes a row less than a text[] of "kind:value".
    identities TEXT NOT NULL,
    PRIMARY KEY (directory_id, id)
) WITH (fillfactor = 90);

INSERT INTO typed_profiles
SELECT p.directory_id, p.id, p.created_ms, p.updated_ms, NULL,
    s #>> '{fields,first_name,value}', orbit_version(s #> '{fields,first_name,version}'),
    s #>> '{fields,last_name,value}', orbit_version(s #> '{fields,last_name,version}'),
    s #>> '{fields,full_name,value}', orbit_version(s #> '{fields,full_name,version}'),
    s #>> '{fields,email,value}', orbit_version(s #> '{fields,email,version}'),
    s #>> '{fields,phone,value}', orbit_version(s #> '{fields,phone,version}'),
    s #>> '{fields,company,value}', orbit_version(s #> '{fields,company,version}'),
    s #>> '{fields,title,value}', orbit_version(s #> '{fields,title,version}'),
    s #>> '{fields,linkedin_url,value}', orbit_version(s #> '{fields,linkedin_url,version}'),
    s #>> '{fields,city,value}', orbit_version(s #> '{fields,city,version}'),
    s #>> '{fields,country,value}', orbit_version(s #> '{fields,country,version}'),
    CASE WHEN s->'attributes' = '{}'::jsonb THEN NULL ELSE (s->'attributes')::text END,
    COALESCE((SELECT string_agg(k.kind || ':' || replace(replace(i.value, '\', '\\'), E'\n', '\n'),
                                E'\n' ORDER BY k.kind, i.value COLLATE "C")
              FROM profile_identities i
              JOIN (VALUES ('email', 0), ('linkedin_url', 1), ('phone', 2)) AS k(name, kind)
                ON k.name = i.kind
              WHERE i.profile_id = p.id), '')
FROM (SELECT *, state::jsonb AS s FROM profiles) p;

DROP FUNCTION orbit_version(JSONB);
DROP TABLE profile_identities;
DROP TABLE profiles;
ALTER TABLE typed_profiles RENAME TO profiles;
ALTER INDEX typed_profiles_pkey RENAME TO profiles_pkey;

ALTER TABLE records DROP COLUMN fields, DROP COLUMN attributes;
