// The HES dashboard's way of listening, with the npm socket.io-client as its docs use it:
//   node hes_client.mjs <baseUrl> <token> <meterId> <seconds>
// joins room meter-<id>, prints every event it receives as one JSON line, exits after <seconds>.
import { io } from 'socket.io-client'

const [base, token, meterId, seconds] = process.argv.slice(2)
const socket = io(base, { auth: { token }, transports: ['websocket'], reconnection: false })
const print = (event, data) => console.log(JSON.stringify({ event, data }))
socket.on('connect', () => {
  print('connect', { id: socket.id })
  socket.emit('join-room', { room: `meter-${meterId}` })
})
socket.on('connect_error', (err) => { print('connect_error', { message: err.message }); process.exit(3) })
socket.onAny((event, data) => print(event, data))
setTimeout(() => { socket.close(); process.exit(0) }, Number(seconds) * 1000)
