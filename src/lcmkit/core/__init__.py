"""Pure math of the teacher's ODE and of consistency models: noise schedules, parameterisations, solver steps, the
boundary condition. Imports nothing of lcmkit."""
