SELECT md5(random()::text), 'chan', 'WebsocketMessage', 'hello payload', '{"mode":"rw","message_delivered_at":1.5}'::jsonb, now(), 'listen' FROM generate_series(1,64) OFFSET 1000;
