DROP TABLE room_assignments;
DROP TABLE breakout_rooms;
DROP TYPE breakout_room_status;
