#!/bin/sh
# Builds the broker's password file from the environment at start-up, so no secret is committed.
# MQTT_BRIDGE_PASSWORD, MQTT_API_PASSWORD, and MQTT_DEVICES="id:password id:password …".
set -eu
out=/mosquitto/config/passwd
: > "$out"
mosquitto_passwd -b "$out" bridge "$MQTT_BRIDGE_PASSWORD"
mosquitto_passwd -b "$out" api "$MQTT_API_PASSWORD"
if [ -n "${MQTT_SIMULATOR_PASSWORD:-}" ]; then
    mosquitto_passwd -b "$out" simulator "$MQTT_SIMULATOR_PASSWORD"
fi
for pair in ${MQTT_DEVICES:-}; do
    mosquitto_passwd -b "$out" "${pair%%:*}" "${pair#*:}"
done
chmod 0700 "$out"
cp /deploy/mosquitto.conf /deploy/acl /mosquitto/config/
