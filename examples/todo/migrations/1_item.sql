CREATE TABLE item (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    title text NOT NULL CHECK (title <> ''),
    done boolean NOT NULL DEFAULT false,
    created timestamptz NOT NULL DEFAULT now()
);
