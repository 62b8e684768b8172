create table orders (id serial primary key, total numeric(10, 2) not null);
